"""The one exception type for errors a user can cause (bad input, budgets, files)."""


class UserError(Exception):
    """An error the user can fix; the CLI prints it as one red line and exits with code 2."""


class BudgetError(UserError):
    """A request does not fit the KV or snapshot budget."""


class ConfigError(UserError):
    """A model config, checkpoint or scenario file is missing or malformed."""
