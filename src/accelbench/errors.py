"""Errors a user can act on. Each message names the file or key, the field and what was expected."""


class AccelbenchError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class ConfigError(AccelbenchError):
    """params.yaml holds an unknown key, a wrong type or an unsupported value."""


class DataError(AccelbenchError):
    """Input data is missing, malformed or unusable."""


class DeviceError(AccelbenchError):
    """The requested device does not exist on this machine."""


class TrackingError(AccelbenchError):
    """The MLflow tracking server cannot be reached, refused the credentials, or failed mid-stage."""


class TrainingError(AccelbenchError):
    """Training diverged (NaN/inf loss) or could not proceed."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM reached a stage; derives from BaseException like KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
