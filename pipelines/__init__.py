"""Glue that runs the graphlora library on Ray (Train + Tune) and records it in MLflow.

The library (`graphlora/`) never imports ray, mlflow or optuna; this package may.
"""
