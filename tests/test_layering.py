"""Layer rules: the library is plain PyTorch; the service reaches the jobs only through the registry."""

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
    bad = {f: sorted(n for n in names if n.split(".")[0] == "jobs" and n != "jobs.registry")
           for f, names in imported_modules("serve").items()}
    assert not {f: n for f, n in bad.items() if n}
