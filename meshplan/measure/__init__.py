"""Measurement: what this machine and the runtime actually do, written as the YAML the planner reads.

calibrate.py      `meshplan calibrate`: matmul rate, copy bandwidth, codec rates and gloo alpha/beta per collective
                  -> a cluster YAML ($XDG_CONFIG_HOME/meshplan/clusters/local.yaml).
error_model.py    the relative error of each compressed collective on the tiny model's tensors, fitted
                  -> configs/error_model.yaml (read by planner/error_model.py).
volumes.py        the bytes the runtime sends per strategy, next to their closed forms.
This package sits above the runtime and the planner (it runs one and writes for the other); neither imports it.
"""
