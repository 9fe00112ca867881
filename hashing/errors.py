"""Errors fedhash raises on bad input. Each message names the problem and the fix in one line."""


class FedhashError(Exception):
    """Base class: anything a user can fix by changing input, config or files."""


class DataError(FedhashError):
    """A data set, image, folder or manifest that cannot be used as given."""


class CodeLengthError(FedhashError):
    """Codes or logits whose bit length does not match the index or model."""


class ModelVersionError(FedhashError):
    """Codes produced by a different hash function than the one an index holds."""


class WeightsError(FedhashError):
    """Backbone weights that cannot be had offline or do not fit the model."""


class ConfigError(FedhashError):
    """A malformed configuration value."""


class TrainingError(FedhashError):
    """Training that cannot go on (NaN loss, empty batch, ...)."""


class IntegrityError(FedhashError):
    """A persisted file (model, checkpoint, index, sidecar, run folder) whose checksum does not match what
    it holds: changed or damaged since fedhash wrote it. The message names the file and the fix."""
