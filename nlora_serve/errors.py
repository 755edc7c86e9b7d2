"""The one exception root for expected failures: the CLI prints these without a traceback."""


class NloraError(Exception):
    """An expected failure whose message tells a person what is wrong and what was expected."""


class ModelError(NloraError):
    """A base model is missing, corrupt or of an unsupported architecture."""


class AdapterError(NloraError):
    """An adapter is missing, malformed, or asks for something this server cannot serve exactly."""
