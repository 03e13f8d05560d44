"""The web app (Gradio): `backend` holds the model and jobs, `app` the page, `spectral-diffusion app` starts it.

The app runs offline: Gradio's telemetry is switched off for the whole process before Gradio is used.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
