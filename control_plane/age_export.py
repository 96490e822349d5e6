"""Exported weights encrypted to their owner's keys with age (filippo.io/age, through `pyrage`).

`save_weights_external` may name up to 10 recipients, as Tinker's does: native X25519 keys
(`age1...`) or SSH public keys (`ssh-ed25519 ...`, `ssh-rsa ...`). Every file written is then
encrypted to all of them and stored with an `.age` suffix in place of the plain file, so what
the object store holds (and what the signed URLs give) only the recipients' identities can read;
`age -d -i <identity>` decrypts one. The recipients are read when the save is asked (a key that
is not one is refused, nothing queued) and again where the files are written.
"""

from __future__ import annotations

from pathlib import Path

import pyrage

from control_plane.interactive_saves import ENCRYPTED_SUFFIX

MAX_RECIPIENTS = 10


def recipients(keys: list[str]) -> list[pyrage.x25519.Recipient | pyrage.ssh.Recipient]:
    """The age recipients `keys` name; ValueError saying which key is not one."""
    if len(keys) > MAX_RECIPIENTS:
        raise ValueError(f"at most {MAX_RECIPIENTS} age recipients, not {len(keys)}")
    parsed: list[pyrage.x25519.Recipient | pyrage.ssh.Recipient] = []
    for index, key in enumerate(keys):
        key = key.strip()
        try:
            if key.startswith("age1"):
                parsed.append(pyrage.x25519.Recipient.from_str(key))
            elif key.startswith("ssh-"):
                parsed.append(pyrage.ssh.Recipient.from_str(key))
            else:
                raise pyrage.RecipientError("neither an age1... key nor an SSH public key")
        except pyrage.RecipientError as error:
            shown = key if len(key) <= 24 else key[:20] + "..."
            raise ValueError(
                f"recipient {index} ({shown!r}) is not an age recipient ({error}): send native "
                "age1... keys (age-keygen -y) or SSH public keys (ssh-ed25519 or ssh-rsa)"
            ) from None
    return parsed


def encrypt_directory(directory: Path, keys: list[str]) -> None:
    """Replace every file under `directory` by itself encrypted to `keys` (`<name>.age`)."""
    to = recipients(keys)
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        sealed = path.with_name(path.name + ENCRYPTED_SUFFIX)
        pyrage.encrypt_file(str(path), str(sealed), to)
        path.unlink()
