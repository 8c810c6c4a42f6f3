"""Experiments as data: a spec (YAML or dataclasses) and a resumable runner that writes a
report folder. ``xferlens demo`` and ``xferlens run spec.yaml`` are thin wrappers."""

from xferlens.experiment.report import summary_table, write_report
from xferlens.experiment.run import STEPS, Run, RunFolderError, run_experiment
from xferlens.experiment.spec import (
    EvalSpec,
    ExperimentSpec,
    MapperSpec,
    ModelSpec,
    SearchSpec,
    SpecError,
    VectorSpec,
    demo_spec,
    load_spec,
    save_spec,
    spec_from_dict,
    validate,
)

__all__ = [
    "STEPS",
    "EvalSpec",
    "ExperimentSpec",
    "MapperSpec",
    "ModelSpec",
    "Run",
    "RunFolderError",
    "SearchSpec",
    "SpecError",
    "VectorSpec",
    "demo_spec",
    "load_spec",
    "run_experiment",
    "save_spec",
    "spec_from_dict",
    "summary_table",
    "validate",
    "write_report",
]
