"""fmkt: FM-KT knowledge distillation (flow matching) with a straight road to deployment.

Public API (imported lazily, so `fmkt-cli --help` does not pay for torch):
    fmkt.create_model(name, num_classes=..., in_channels=...), fmkt.list_models()
    fmkt.DeployableModel, fmkt.build_config, fmkt.fit, fmkt.load_artifact, fmkt.FmktError

Your own models (README "Python API and your own models"; fmkt/api.py):
    fm = fmkt.FMKT(student, teacher, example=images, loss="dist", encoder="conv", train_steps=8)
    fm.loss(images, labels) in your loop (optimise fm.parameters()), or fm.fit(loader, epochs=...)
    fm.evaluate(loader, steps=[1, 2, 4]); fm.save("runs/x/artifact"); fmkt.export_artifact("runs/x/artifact", 4)
    fmkt.wrap_student(model, example) shows where the feature map and the head were found.
"""
__version__ = "0.1.0"

_LAZY = {
    "create_model": "fmkt.models",
    "list_models": "fmkt.models",
    "register_model": "fmkt.models",
    "DeployableModel": "fmkt.student",
    "Config": "fmkt.config",
    "build_config": "fmkt.config",
    "fit": "fmkt.engine",
    "evaluate": "fmkt.evaluation",
    "load_artifact": "fmkt.artifact",
    "save_artifact": "fmkt.artifact",
    "load_dataset": "fmkt.data",
    "build_distiller": "fmkt.distillers",
    "build_schedule": "fmkt.flow.schedules",
    "build_encoder": "fmkt.flow.encoders",
    "run_sampler": "fmkt.flow.sampler",
    "FmktError": "fmkt.errors",
    "FMKT": "fmkt.api",
    "wrap_student": "fmkt.api",
    "export_artifact": "fmkt.api",
    "ModuleAdapter": "fmkt.models.adapter",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fmkt' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
