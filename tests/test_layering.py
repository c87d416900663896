"""Layer rules: the library is plain PyTorch; the service reaches the jobs only through the registry (and the one
way of starting Ray)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(folder: str) -> dict[str, set[str]]:
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


def test_library_never_imports_ray_mlflow_jobs_or_serve():
    bad = {f: sorted(n for n in names if n.split(".")[0] in {"ray", "mlflow", "jobs", "serve"})
           for f, names in imported_modules("fingerprint").items()}
    assert not {f: n for f, n in bad.items() if n}


def test_serve_reaches_jobs_only_through_the_registry():
    allowed = {"jobs.registry", "jobs.ray_session"}
    bad = {f: sorted(n for n in names if n.split(".")[0] == "jobs" and n not in allowed)
           for f, names in imported_modules("serve").items()}
    assert not {f: n for f, n in bad.items() if n}


def _calls(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                yield path.relative_to(ROOT), node


PICKLERS = {"pickle", "joblib", "cloudpickle", "dill"}


def test_nothing_a_user_or_bucket_supplies_is_unpickled():
    """Files are JSON, safetensors or tensors-only torch files: no pickle, joblib or object arrays anywhere."""
    bad = []
    for folder in ("fingerprint", "jobs", "serve"):
        for f, names in imported_modules(folder).items():
            bad += [f"{f}: imports {n}" for n in names if n.split(".")[0] in PICKLERS]
        for path, call in _calls(folder):
            name = ast.unparse(call.func)
            kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name.endswith("torch.load") and kw.get("weights_only") != "True":
                bad.append(f"{path}:{call.lineno}: torch.load without weights_only=True")
            if name.endswith(("np.load", "numpy.load")) and kw.get("allow_pickle") not in (None, "False"):
                bad.append(f"{path}:{call.lineno}: np.load with allow_pickle")
    assert not bad, bad
