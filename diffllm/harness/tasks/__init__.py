"""The project's lm-eval tasks: YAML files over the embedded tiny rows (``utils.py`` builds the documents)."""
