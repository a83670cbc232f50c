"""Schemathesis hooks for tests/test_openapi.py (loaded through SCHEMATHESIS_HOOKS).

They keep out one false positive of schemathesis 4.32's negative data: a form field drawn as an
empty list is sent as no part at all in multipart/form-data, so the request on the wire is a valid
one (the field's default applies) that the service rightly accepts, yet schemathesis expects it
refused because the value it drew was of the wrong type.
"""
import schemathesis


@schemathesis.hook
def filter_body(context, body) -> bool:
    return not (isinstance(body, dict) and any(value == [] for value in body.values()))
