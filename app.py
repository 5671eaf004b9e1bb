"""Start the quantlab app (Gradio): `python app.py [--host 127.0.0.1] [--port 7860] [--auth u:p]`.

Same as `quantlab app`; see quantlab/webapp.py."""

import sys

from quantlab.webapp import main

if __name__ == "__main__":
    sys.exit(main())
