"""User-facing errors: each says what is wrong, where, and how to fix it, in one line."""


class RecipeError(Exception):
    """Bad input (config, data, checkpoint, environment). ``train.py`` prints it as one line and exits 2."""


class ConfigError(RecipeError):
    """An invalid or inconsistent configuration value."""


class DataError(RecipeError):
    """Missing, empty or corrupt data, or a tokenizer that does not fit the model."""


class CheckpointError(RecipeError):
    """A checkpoint that cannot be loaded into this run."""


class TrainingError(RecipeError):
    """A run that cannot go on (e.g. a non-finite loss)."""
