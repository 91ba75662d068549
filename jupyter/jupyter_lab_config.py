"""JupyterLab for a classroom: `make lab` and `make student-lab` put this folder on JUPYTER_CONFIG_PATH.

Nothing reaches the network and nothing pops up that a learner cannot act on: no extension-manager
look-ups on PyPI, no news feed, no update check, and (lab/settings/overrides.json) no "get news?"
question. Beside this file, jupyter_server_config.json gives kernels encrypted connections (so no
"running over TCP without encryption" warning at each kernel start) and switches off Jupytext's server
extension, which otter-grader installs and the course does not use (labconfig/page_config.json: its
launcher items). Your own ~/.jupyter configuration still wins over these settings.
"""
from pathlib import Path

c = get_config()  # noqa: F821 (defined by jupyter when it reads this file)
c.LabApp.extension_manager = "readonly"                              # list installed extensions only
c.LabApp.news_url = None                                             # no news feed
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"  # no "a new JupyterLab is out"
c.LabApp.app_settings_dir = str(Path(__file__).resolve().parent / "lab" / "settings")  # overrides.json
