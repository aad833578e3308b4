"""The registries' names as plain tuples, for `fmkt-cli distill --help` (which prints them without importing torch).

Each thing is still defined once, in its registry; tests/test_registries.py holds every tuple equal to its
registry's keys, so a new entry there fails that test until its name is added here.
"""

METHOD_NAMES = ("none", "kd", "dkd", "dist", "fmkt", "theta", "ofmkt")  # fmkt.distillers.METHODS
LOSS_NAMES = ("kd", "dkd", "dist", "pkd", "mse")  # fmkt.losses.LOSSES
ENCODER_NAMES = ("conv", "dwconv", "mlp", "transformer")  # fmkt.flow.encoders.ENCODERS
SCHEDULE_NAMES = ("rectified", "vp", "ve")  # fmkt.flow.schedules.SCHEDULES
TASK_NAMES = ("classification", "detection")  # config key task (fmkt.commands dispatches; detection: fmkt.detection)
DETECTION_METHOD_NAMES = ("fmkt", "pkd", "none")  # fmkt.detection.distiller.METHODS
