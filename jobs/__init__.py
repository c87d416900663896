"""Ray, MLflow and the jobs built on them.

Ray reads its auth mode when it is imported, so importing this package (before any of its modules imports ray)
puts a process that will start an embedded Ray on token auth (:mod:`jobs.ray_session`). A process joining a
cluster named by ``RAY_ADDRESS``, or one where Ray is already imported (a Ray worker), is left as it is.
"""

import os
import sys

if "ray" not in sys.modules and not os.environ.get("RAY_ADDRESS"):
    from jobs.ray_session import secure_local_auth

    secure_local_auth()
