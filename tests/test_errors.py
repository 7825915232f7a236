"""The exception hierarchy covers every error the Go original defines."""

from __future__ import annotations

import re

import pytest

from torus_core import errors

# The Go sentinel errors (torus-godoc.txt) and the class each maps to.
GO_ERRORS = {
    "ErrBlockUnavailable": "BlockUnavailable",
    "ErrINodeUnavailable": "INodeUnavailable",
    "ErrBlockNotExist": "BlockNotExist",
    "ErrClosed": "Closed",
    "ErrInvalid": "InvalidArgument",
    "ErrOutOfSpace": "OutOfSpace",
    "ErrExists": "AlreadyExists",
    "ErrNotExist": "NotExist",
    "ErrAgain": "Again",
    "ErrNoGlobalMetadata": "NoGlobalMetadata",
    "ErrNonSequentialRing": "NonSequentialRing",
    "ErrNoPeer": "NoPeer",
    "ErrCompareFailed": "CompareFailed",
    "ErrIsSymlink": "IsSymlink",
    "ErrNotDir": "NotDir",
    "ErrWrongVolumeType": "WrongVolumeType",
    "ErrNotSupported": "NotSupported",
    "ErrLocked": "Locked",
    "ErrLeaseNotFound": "LeaseNotFound",
    "ErrUsage": "UsageError",
}


@pytest.mark.parametrize(("go_name", "py_name"), sorted(GO_ERRORS.items()))
def test_every_go_error_has_a_torus_error_class(go_name: str, py_name: str) -> None:
    cls = getattr(errors, py_name)
    assert issubclass(cls, errors.TorusError)
    doc = errors.__doc__ or ""
    assert re.search(rf"{go_name}\s+:class:`{py_name}`", doc), f"{go_name} missing from the mapping table"


def test_retryable_errors_are_marked_and_others_are_not() -> None:
    assert errors.MetadataUnavailable("x").retryable and errors.BlockUnavailable("x").retryable
    assert errors.Again("x").retryable and errors.NoPeer("x").retryable
    assert not errors.CompareFailed("x").retryable and not errors.Locked("x").retryable


def test_plugin_and_config_errors_share_the_root() -> None:
    assert issubclass(errors.UnknownBackendError, errors.ConfigError)
    assert issubclass(errors.DuplicateBackendError, errors.PluginError)
    assert issubclass(errors.PluginLoadError, errors.TorusError)
