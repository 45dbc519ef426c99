"""Policy TOML files: every value of the wrong type or range is ``malformed``, never a traceback.

Each case here raised AttributeError, TypeError or ValueError, or was accepted
with a wrong meaning (a digit of another script read as a number, a duration
too long for the documents and certificates it ends up in), before the policy
reader checked each value's type and used ASCII digits only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qhx_edge.core.errors import Malformed
from qhx_edge.core.policyfile import MAX_DURATION, duration, parse_policy_file
from tests.conftest import PASSPHRASE, make_homes, run_cli

BAD = {
    "superscript digit": '[staleness]\nsoft = "²h"\n',
    "federation not a table": "federation = 5\n",
    "federation unknown setting": '[federation]\nmax_staleness = "1h"\n',
    "federation cap not a duration": "[federation]\nmax_partner_staleness = true\n",
    "federation spiffe_bundles not a boolean": '[federation]\nspiffe_bundles = "no"\n',
    "arabic-indic digit": '[staleness]\nsoft = "٣h"\n',
    "staleness not a table": "staleness = 5\n",
    "algorithms not a table": 'algorithms = "ES256"\n',
    "algorithm not a name": '[algorithms]\n"/" = 5\n',
    "registrations not an array of tables": "registrations = 5\n",
    "authorization item not a table": "authorization = [5]\n",
    "pcrs not a table": "[attestation.tpm]\npcrs = 5\n",
    "pcr label not a number": '[attestation.tpm.pcrs]\n"x" = "00"\n',
    "pcr label of another script": '[attestation.tpm.pcrs]\n"٣" = "' + "00" * 32 + '"\n',
    "pcr index out of range": '[attestation.tpm.pcrs]\n"24" = "' + "00" * 32 + '"\n',
    "pcr value not 32 bytes": '[attestation.tpm.pcrs]\n"7" = "00"\n',
    "duration overflowing": '[staleness]\nsoft = "99999999999999999999999d"\n',
    "integer overflowing": "[staleness]\nsoft = 99999999999999999999\n",
    "unknown attestation setting": "[attestation]\nfoo = 1\n",
    "not utf-8": "\udcff",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_policy_value_is_malformed(name: str) -> None:
    text = BAD[name].encode("utf-8", "surrogateescape")
    with pytest.raises(Malformed) as exc:
        parse_policy_file(text, "p.toml")
    assert exc.value.kind == "malformed"


def test_good_values_still_read() -> None:
    pcr = "ab" * 32
    fields = parse_policy_file(
        f'[staleness]\nsoft = "6h"\nhard = 259200\n[attestation.tpm.pcrs]\n"07" = "{pcr}"\n'.encode(), "p.toml"
    )
    assert fields["staleness"]["soft"] == 6 * 3600
    assert fields["staleness"]["hard"] == 259200
    assert fields["attestation"] == {"tpm": {"pcrs": {"7": bytes.fromhex(pcr)}}}
    assert duration(f"{MAX_DURATION}") == MAX_DURATION
    with pytest.raises(Malformed):
        duration(MAX_DURATION + 1)


def test_cli_bad_policy_and_overflowing_ttl_are_exit_1_and_change_nothing(tmp_path: Path) -> None:
    homes = make_homes(tmp_path, import_first=False)
    home = homes.authority.home
    state = (home / "authority.json").read_bytes()
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD["registrations not an array of tables"])
    env = {"QHX_EDGE_PASSPHRASE": PASSPHRASE}
    r = run_cli("--json", "--home", home, "authority", "publish", "policy", bad, env=env)
    assert (r.code, r.json["error"]["kind"]) == (1, "malformed"), r.stdout + r.stderr
    r = run_cli("--json", "--home", home, "authority", "join-token", "create", "--ttl", "9" * 30 + "d", env=env)
    assert (r.code, r.json["error"]["kind"]) == (1, "malformed"), r.stdout + r.stderr
    assert (home / "authority.json").read_bytes() == state
    assert "Traceback" not in r.stderr


def test_the_federation_limits_round_trip_through_a_policy_document() -> None:
    from qhx_edge.core import documents as D  # noqa: N812

    fields = parse_policy_file(b'[federation]\nmax_partner_staleness = "24h"\nspiffe_bundles = false\n', "p.toml")
    common = {"type": "policy", "domain": "alpha.example", "version": 1, "issued_at": 1, "expires": 2}
    p = D.Policy.from_dict({**common, **fields, "staleness": {"soft": 1, "hard": 2, "svid_ttl": 1, "ttl_floor": 1}})
    assert p.federation == D.PartnerLimits(86400, spiffe_bundles=False)
    assert D.Policy.from_dict(p.to_dict()) == p
    plain = D.Policy.from_dict({**p.to_dict(), "federation": {}})
    assert "federation" not in plain.to_dict()  # the default writes nothing: older policies keep their bytes
