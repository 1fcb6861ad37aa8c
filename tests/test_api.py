"""The daemon's operations: the one table from exceptions to protocol codes."""
import pytest

from cllmd.api import ERROR_CODES, protocol_errors
from cllmd.protocol import ERROR_CODES as WIRE_CODES
from cllmd.protocol import ProtocolError
from cllmd.tokenizer import TokenizerError
from cllmd.queuedir import FileTooLarge, NotInQueue, QueueError


@pytest.mark.parametrize("exc, code", [
    (FileTooLarge("big.txt: 9 bytes, the limit is 8"), "too_large"),
    (NotInQueue("no failed file 'x.txt'"), "not_found"),
    (QueueError("bad name"), "bad_request"),
    (TokenizerError("token id 999 is outside the vocabulary"), "bad_request"),
    (ValueError("top_p must be a number > 0 and <= 1, got 0"), "bad_request"),
])
def test_api_protocol_errors_map_each_exception_to_its_code(exc, code):
    with pytest.raises(ProtocolError) as e:
        with protocol_errors():
            raise exc
    assert (e.value.code, e.value.message) == (code, str(exc))


def test_api_protocol_errors_pass_other_exceptions_and_protocol_errors_through():
    with pytest.raises(KeyError):
        with protocol_errors():
            raise KeyError("a bug: the server answers internal")
    original = ProtocolError("unavailable", "not now")
    with pytest.raises(ProtocolError) as e:
        with protocol_errors():
            raise original
    assert e.value is original


def test_api_error_table_uses_protocol_codes_most_specific_first():
    assert all(code in WIRE_CODES for _, code in ERROR_CODES)
    kinds = [k for k, _ in ERROR_CODES]
    for i, k in enumerate(kinds):  # no entry is shadowed by an earlier, broader one
        assert not any(issubclass(k, earlier) for earlier in kinds[:i]), k
