"""What a config field or argument may hold, asked the same way everywhere: Python's bool is an
int, so True would pass as 1 (or as a rank, or as a learning rate) without these."""
import math


def is_number(value) -> bool:
    """An int or a float, not a bool and not nan (inf is a number; callers bound it)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and not math.isnan(value))


def is_whole_number(value, low: int = 0) -> bool:
    """An int (not a bool) that is at least `low`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low
