#!/usr/bin/env python3
"""Writes the runbook's data the way its EncryptionKeyManager did, with
Python's `cryptography` package (the real Fernet): a table of encrypted rows
as tab-separated text (id, email, mobno, email_plain, mobno_plain) and the
key store's rows as JSON. Usage: fernet_fixture.py ROWS OUTDIR [--bare-key-only]

Values: most are FERNET_V2:<key_id>:<token> (rows of the first half made when
the older key was current, the rest with the newer one, encrypted with
MultiFernet as the manager did), some bare tokens (the V1 format, the older
key), NULLs, empty strings and non-ASCII text. A few rows of `mobno` carry a
token made with a key that is NOT exported (the runbook lost it): no
imported key decrypts those.
"""
import base64
import json
import os
import sys

from cryptography.fernet import Fernet, MultiFernet

rows = int(sys.argv[1])
out = sys.argv[2]
os.makedirs(out, exist_ok=True)

old_key, new_key, lost_key = (Fernet.generate_key() for _ in range(3))
old_id, new_id = "key_20250927_153045_b7c2", "key_20251226_abc123"
lost_rows = set(range(7, rows + 1, max(rows // 5, 1))) if "--with-lost" in sys.argv else set()


def v2(key_id, mf, text):
    return f"FERNET_V2:{key_id}:{mf.encrypt(text.encode()).decode()}"


mf_old = MultiFernet([Fernet(old_key)])
mf_new = MultiFernet([Fernet(new_key), Fernet(old_key)])
bare_old = Fernet(old_key)
lost = Fernet(lost_key)


def esc(v):
    if v is None:
        return r"\N"
    return v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


with open(os.path.join(out, "people.tsv"), "w", encoding="utf-8") as f:
    for i in range(1, rows + 1):
        email = f"user{i}@example.com" if i % 11 else f"zoë.ümlaut{i}@例え.jp"
        mobno = "+91" + str(i).zfill(10) if i % 13 else ""
        if i % 17 == 0:
            email = None
        if i % 5 == 0:
            e = bare_old.encrypt(email.encode()).decode() if email is not None else None
        elif i <= rows // 2:
            e = v2(old_id, mf_old, email) if email is not None else None
        else:
            e = v2(new_id, mf_new, email) if email is not None else None
        m = v2(new_id if i % 2 else old_id, mf_new if i % 2 else mf_old, mobno)
        if i in lost_rows:
            m = "FERNET_V2:key_lost:" + lost.encrypt(mobno.encode()).decode()
        f.write("\t".join(esc(x) for x in (str(i), e, m, email, mobno)) + "\n")

keys = [
    {"key_id": old_id, "key": old_key.decode(), "created_at": "2025-09-27T15:30:45Z",
     "rotation_status": "rotating", "is_active": False},
    {"key_id": new_id, "key": new_key.decode(), "created_at": "2025-12-26T09:15:00Z",
     "rotation_status": "active", "is_active": True},
]
with open(os.path.join(out, "keys.json"), "w") as f:
    json.dump(keys, f)
print(f"{rows} rows; keys {old_id}, {new_id}; {len(lost_rows)} values on a key not exported")
