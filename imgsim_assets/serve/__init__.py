"""``imgsim serve``: the live index over HTTP, with a web page (see :mod:`imgsim_assets.serve.app`)."""
