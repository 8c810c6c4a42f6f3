"""Every exception class xferlens defines derives from ``XferlensError`` (and still from
the builtin it always did, so ``except ValueError`` in users' code keeps working)."""

import importlib
import inspect
import pkgutil

import xferlens
from xferlens.errors import ModelMismatchError, XferlensError

#: defined in xferlens/experiment, which another change owns for now; they join the base
#: there (``class SpecError(XferlensError, ValueError)``), then leave this list
EXPERIMENT = {"xferlens.experiment.spec.SpecError", "xferlens.experiment.run.RunFolderError"}


def _exception_classes() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(xferlens.__path__, "xferlens."):
        if info.name.endswith(".__main__"):  # runs the command line on import
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_exception_class_is_a_xferlens_error():
    found = _exception_classes()
    assert len(found) >= 20 and set(found) >= EXPERIMENT
    outside = sorted(n for n, c in found.items() if not issubclass(c, XferlensError))
    assert not outside, f"exception classes that do not derive from XferlensError: {outside}"


def test_each_keeps_the_builtin_it_derived_from():
    from xferlens.features import SAEMismatchError
    from xferlens.mappers import MapperFileError, MapperMismatchError
    from xferlens.steering import SteeringMismatchError
    from xferlens.zoo import UnknownModelError, ZooError

    for cls in (MapperMismatchError, SteeringMismatchError, SAEMismatchError, MapperFileError):
        assert issubclass(cls, ValueError) and issubclass(cls, XferlensError)
    for cls in (MapperMismatchError, SteeringMismatchError, SAEMismatchError):
        assert issubclass(cls, ModelMismatchError)
    assert issubclass(ZooError, RuntimeError) and issubclass(UnknownModelError, KeyError)


def test_the_top_level_package_exports_the_base_and_the_identity():
    from xferlens.identity import ModelId

    assert xferlens.XferlensError is XferlensError and xferlens.ModelId is ModelId
    assert xferlens.ModelMismatchError is ModelMismatchError
