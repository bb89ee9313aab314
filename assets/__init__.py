"""Data files the app reads at run time (chat templates under templates/).

A package so that one lookup finds them in a checkout and in an installed wheel alike:
`importlib.resources.files("assets") / "templates" / "NAME.jinja"`.
"""
