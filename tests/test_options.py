"""``build_options``: an attrs options class built from a plain mapping, every error naming the
config path; the validators plugin authors use; did-you-mean hints."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import attrs
import pytest

from qlora_plugins.errors import ConfigError
from qlora_plugins.options import build_options, closest, in_range, one_of, options_to_dict, positive, power_of_two


@attrs.define
class Inner:
    """A nested options class."""

    depth: int = attrs.field(default=1, validator=in_range(1, 3))


@attrs.define
class Example:
    """Every annotation kind build_options understands."""

    path: str
    count: int = attrs.field(default=2, validator=positive)
    ratio: float = attrs.field(default=0.5, validator=in_range(0.0, 1.0))
    flag: bool = False
    mode: Literal["fast", "slow"] = "fast"
    size: int = attrs.field(default=64, validator=power_of_two(32, 4096))
    color: str = attrs.field(default="red", validator=one_of("red", "green", "blue"))
    names: list[str] = attrs.field(factory=list)
    numbers: list[float] = attrs.field(factory=lambda: [1.0])
    limit: Optional[int] = None
    targets: Union[Literal["all"], list[str]] = "all"
    extra: dict = attrs.field(factory=dict)
    anything: Any = None
    inner: Inner = attrs.field(factory=Inner)


def build(**data: Any) -> Example:
    return build_options(Example, {"path": "p", **data}, "section")


def message(**data: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        build(**data)
    return str(exc.value)


def test_defaults_and_values():
    opts = build()
    assert opts == Example(path="p")
    opts = build(
        count=3,
        ratio=1,
        flag=True,
        mode="slow",
        size=128,
        color="blue",
        names=["a"],
        numbers=[1, 2.5],
        limit=None,
        targets=["q", "v"],
        extra={"k": 1},
        anything=[1, "x"],
        inner={"depth": 3},
    )
    assert opts.ratio == 1.0 and isinstance(opts.ratio, float)
    assert opts.numbers == [1.0, 2.5] and all(isinstance(n, float) for n in opts.numbers)
    assert opts.targets == ["q", "v"] and opts.inner == Inner(3)


def test_mild_coercions():
    assert build(count=4.0).count == 4 and isinstance(build(count=4.0).count, int)
    assert build(ratio="5e-1").ratio == 0.5  # YAML 1.1 reads 5e-1 as a string
    assert build(names=("a", "b")).names == ["a", "b"]


def test_required_and_unknown_keys():
    with pytest.raises(ConfigError) as exc:
        build_options(Example, {}, "section")
    assert str(exc.value) == "section.path: is required"
    assert message(cuont=1) == "section.cuont: unknown key (did you mean 'count'?)"
    assert message(zzz=1).startswith("section.zzz: unknown key; valid keys: anything, color, count, extra, flag, inner, limit, mode")


def test_no_path_prefix():
    with pytest.raises(ConfigError) as exc:
        build_options(Example, {"path": 3})
    assert str(exc.value) == "path: must be a string, got 3"
    assert exc.value.path == "path"


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"count": "3"}, "section.count: must be an integer, got '3'"),
        ({"count": True}, "section.count: must be an integer, got True"),
        ({"count": 2.5}, "section.count: must be an integer, got 2.5"),
        ({"ratio": "half"}, "section.ratio: must be a number, got 'half'"),
        ({"ratio": False}, "section.ratio: must be a number, got False"),
        ({"ratio": float("nan")}, "section.ratio: must be a finite number, got nan"),
        ({"flag": "true"}, "section.flag: must be true or false, got 'true'"),
        ({"flag": 0}, "section.flag: must be true or false, got 0"),
        ({"mode": "fats"}, "section.mode: must be one of 'fast', 'slow', got 'fats' (did you mean 'fast'?)"),
        ({"mode": 1}, "section.mode: must be one of 'fast', 'slow', got 1"),
        ({"names": "a"}, "section.names: must be a list of a string, got 'a'"),
        ({"names": ["a", 2]}, "section.names[1]: must be a string, got 2"),
        ({"numbers": [1, None]}, "section.numbers[1]: must be a number, got None"),
        ({"limit": "x"}, "section.limit: must be an integer, got 'x'"),
        ({"targets": "some"}, "section.targets: must be one of 'all' or a list of a string, got 'some'"),
        ({"extra": [1]}, "section.extra: must be a mapping, got [1]"),
        ({"inner": 3}, "section.inner: must be a mapping, got 3"),
        ({"inner": {"depht": 2}}, "section.inner.depht: unknown key (did you mean 'depth'?)"),
        ({"inner": {"depth": 9}}, "section.inner.depth: must be in [1, 3], got 9"),
    ],
)
def test_type_errors_name_the_path(data, expected):
    assert message(**data) == expected


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"count": 0}, "section.count: must be > 0, got 0"),
        ({"ratio": 1.5}, "section.ratio: must be in [0.0, 1.0], got 1.5"),
        ({"size": 100}, "section.size: must be a power of two in [32, 4096], got 100"),
        ({"size": 16}, "section.size: must be a power of two in [32, 4096], got 16"),
        ({"size": 0}, "section.size: must be a power of two in [32, 4096], got 0"),
        ({"color": "gren"}, "section.color: must be one of red, green, blue, got 'gren' (did you mean 'green'?)"),
    ],
)
def test_validators_name_the_path(data, expected):
    assert message(**data) == expected


def test_unbounded_range_message():
    @attrs.define
    class Low:
        x: int = attrs.field(default=1, validator=in_range(1, None))

    with pytest.raises(ConfigError, match=r"^x: must be in \[1, inf\], got 0$"):
        build_options(Low, {"x": 0})


def test_plain_validators_errors_are_path_qualified():
    @attrs.define
    class Own:
        """A plugin's own validator raising a plain ValueError(message, attribute)."""

        pair: list[int] = attrs.field(factory=lambda: [1, 2])

        @pair.validator
        def _check(self, attribute, value):
            if len(value) != 2:
                raise ValueError("must have two items", attribute)

    with pytest.raises(ConfigError) as exc:
        build_options(Own, {"pair": [1]}, "adapter")
    assert str(exc.value) == "adapter.pair: must have two items"


def test_did_you_mean_helpers():
    assert closest("nf5", ["nf4", "fp4", "none"]) == "nf4"
    assert closest("zzzz", ["nf4", "fp4"]) is None


def test_options_to_dict():
    assert options_to_dict(None) == {}
    out = options_to_dict(build(inner={"depth": 2}))
    assert out["inner"] == {"depth": 2} and out["path"] == "p" and out["names"] == []
