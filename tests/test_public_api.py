"""Every name the package root advertises resolves to the object its module defines."""

import importlib

import pytest

import spectral_diffusion


@pytest.mark.parametrize("name", sorted(spectral_diffusion._EXPORTS))
def test_public_name_resolves(name: str) -> None:
    module = importlib.import_module(f"spectral_diffusion.{spectral_diffusion._EXPORTS[name]}")
    assert getattr(spectral_diffusion, name) is getattr(module, name)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        spectral_diffusion.no_such_thing  # noqa: B018
