"""The config model: the routing YAML's keys, their defaults and bounds (fields.py), read into
frozen dataclasses (model.py) with the key path of every problem (yamlsource.py). The model
is pure; loading.py alone reads a file. Imports nothing of the proxy."""
