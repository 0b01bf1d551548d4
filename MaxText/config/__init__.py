"""The config: every key declared once (schema.py, keys.py; the families' own beside them in models/), the layers
of YAML, presets, environment and command line that set them (loader.py), the checks that need the registries
and the mesh (validation.py), and two views of the declarations, `--help` and base_v2.yml (render.py)."""
