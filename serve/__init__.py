"""The scoring service (Ray Serve). Importing it first puts an embedded Ray on token auth, as :mod:`jobs` does."""

import os
import sys

if "ray" not in sys.modules and not os.environ.get("RAY_ADDRESS"):
    from jobs.ray_session import secure_local_auth

    secure_local_auth()
