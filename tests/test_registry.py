import pytest

from automlprune.errors import ConfigError
from automlprune.registry import Registry


def test_duplicate_name_raises():
    reg = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)


def test_unknown_name_lists_choices():
    reg = Registry("thing")
    reg.register("alpha", 1)
    with pytest.raises(ConfigError, match="unknown thing 'beta'; choose one of: alpha"):
        reg.get("beta")


def test_lazy_entry_imports_on_first_use():
    reg = Registry("thing")
    reg.register("join", "os.path:join", description="lazy")
    import os.path

    assert reg.get("join") is os.path.join
    assert reg.metadata("join") == {"description": "lazy"}
