"""Helpers for plugin options classes: validators that produce path-qualified config errors."""

from qlora_plugins.core.options import build_options, check_range, closest, in_range, one_of, options_to_dict, positive, power_of_two

__all__ = ["build_options", "check_range", "closest", "in_range", "one_of", "options_to_dict", "positive", "power_of_two"]
