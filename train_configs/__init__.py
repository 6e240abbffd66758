"""The YAML configs shipped with tf_explog (installed as ``tf_explog.train_configs``).

See ``tf_explog.config.packaged_config``; the files are read, never imported.
"""
