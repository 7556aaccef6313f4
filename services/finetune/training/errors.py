"""The error a recipe or the loop raises for the user (its own module: the loop and the recipes both raise it)."""


class TrainingInputError(ValueError):
    """Something about the job's data or model that only shows once training starts; its message is written
    for the user (what is wrong, what to change) and becomes the job's error as is."""
