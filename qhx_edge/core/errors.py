"""Typed errors of qhx-edge, one class per stable ``kind``.

Errors split by who is at fault (the python-tuf split):

* :class:`Rejected` -- the *input* is bad (a document, a pack, a clock reading
  that contradicts trusted time). CLI exit code 1; ``error.kind`` is the stable
  string below, printed in ``--json`` output and written to the audit log.
* :class:`EnvironmentFault` -- the *environment* is wrong (a missing file, a
  locked store, a wrong passphrase, no TPM). CLI exit code 3.

Usage errors (exit code 2) are click's own.  Every implementation error from a
library (cbor2, cryptography, sqlite3) is wrapped into one of these before it
leaves the package, so a caller only ever has to catch :class:`QhxError`.
"""

from __future__ import annotations

from typing import ClassVar


class QhxError(Exception):
    """Base of every error qhx-edge raises on purpose."""

    kind: ClassVar[str] = "error"
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message}


class Rejected(QhxError):
    """Input rejected: the store is left unchanged (exit code 1)."""

    kind = "rejected"
    exit_code = 1


class Malformed(Rejected):
    kind = "malformed"


class Incomplete(Malformed):
    """Well-formed so far, but the data ends early: a truncated file, or one still being written.

    Its kind stays ``malformed`` (an incomplete pack is refused like any other
    malformed one); ``pack watch`` uses the class to wait for a writer instead
    of rejecting a file that is still growing.
    """


class NonDeterministic(Rejected):
    kind = "non-deterministic"


class Oversize(Rejected):
    kind = "oversize"


class BadSignature(Rejected):
    kind = "bad-signature"


class ThresholdNotMet(Rejected):
    kind = "threshold"


class WrongRole(Rejected):
    kind = "wrong-role"


class UnknownDomain(Rejected):
    kind = "unknown-domain"


class DomainMismatch(Rejected):
    kind = "domain-mismatch"


class Rollback(Rejected):
    kind = "rollback"


class EqualVersionConflict(Rejected):
    kind = "equal-version-conflict"


class Expired(Rejected):
    kind = "expired"


class NotYetValid(Rejected):
    kind = "not-yet-valid"


class MixAndMatch(Rejected):
    kind = "mix-and-match"


class ClockRollback(Rejected):
    kind = "clock-rollback"


class NoAgreement(Rejected):
    kind = "no-agreement"


class ScopeViolation(Rejected):
    kind = "scope-violation"


class Stale(Rejected):
    kind = "stale"


class Revoked(Rejected):
    """A chain through a key the domain's pki role revoked (a node's CA or JWT key: ``revocation``)."""

    kind = "revoked"


class NotRecipient(Rejected):
    kind = "not-recipient"


class AttestationFailed(Rejected):
    kind = "attestation-failed"


class PolicyDenied(Rejected):
    kind = "policy-denied"


class Downgrade(Rejected):
    kind = "downgrade"


class AnchorMismatch(Rejected):
    kind = "anchor-mismatch"


class MissingHistory(Rejected):
    """A receipt names a document (a root chain, a bundle version) the verifier's history does not hold:
    what it names cannot be checked, so the receipt is not proven (``receipt verify``).  ``report`` says
    what the rest proved."""

    kind = "missing-history"

    def __init__(self, message: str, report: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.report = report


class EnvironmentFault(QhxError):
    """The environment is wrong, not the input (exit code 3)."""

    kind = "environment"
    exit_code = 3


class Unreachable(EnvironmentFault):
    """A peer could not be reached or stopped answering (a link down, refused, timed out)."""

    kind = "unreachable"


class NoIdentity(EnvironmentFault):
    """The Workload API attests this process to no registration: it has no SVID to present."""

    kind = "no-identity"


class MissingFile(EnvironmentFault):
    kind = "missing-file"


class StoreLocked(EnvironmentFault):
    kind = "store-locked"


class NotInitialised(EnvironmentFault):
    kind = "not-initialised"


class AlreadyInitialised(EnvironmentFault):
    kind = "already-initialised"


class PassphraseError(EnvironmentFault):
    kind = "passphrase"


class StoreCorrupt(EnvironmentFault):
    kind = "store-corrupt"


class NoTpm(EnvironmentFault):
    kind = "no-tpm"


class UnsafePath(EnvironmentFault):
    """A path that must be a real file or directory in its place is a link, a special file or elsewhere."""

    kind = "unsafe-path"


def all_kinds() -> dict[str, type[QhxError]]:
    """Every stable kind and its class (used by docs and tests)."""
    out: dict[str, type[QhxError]] = {}
    stack: list[type[QhxError]] = [QhxError]
    while stack:
        cls = stack.pop()
        out.setdefault(cls.kind, cls)  # a refinement (Incomplete) keeps its parent's kind
        stack.extend(cls.__subclasses__())
    return out


def printable(text: str) -> str:
    """Text from outside (a file name, a peer's words) made safe for one line of a message or a log:
    no control characters (a terminal escape shows as ``\\x1b``), no surrogates."""
    try:  # a name that is not UTF-8 shows its bytes (os.fsdecode escaped them as surrogates)
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
