"""The safetensors reader refuses what the format does not allow, with a message that says why;
round trips are bit-exact for every dtype it holds."""
import json
import struct
import types

import pytest
import torch

import tiny_gpt.util.safetensors as st
from tiny_gpt.util.safetensors import DTYPES, SafetensorsError, deserialize, serialize


def raw_file(header_text: str, data: bytes = b"") -> bytes:
    head = header_text.encode()
    return struct.pack("<Q", len(head)) + head + data


ENTRY = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'


def test_every_dtype_round_trips_bit_exactly():
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(3, 5, generator=gen) * 50).to(dtype)
               for name, dtype in DTYPES.items() if dtype != torch.bool}
    tensors["BOOL"] = torch.tensor([[True, False, True]])
    tensors["empty"] = torch.zeros(0, 4)
    back, meta = deserialize(serialize(tensors, {"k": "v"}))
    assert meta == {"k": "v"} and back.keys() == tensors.keys()
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("metadata", ["[]", "[1, 2]", "0", "7", "null", '"text"',
                                      '{"a": 1}'])
def test_metadata_that_is_not_a_map_of_strings_is_refused(metadata):
    raw = raw_file(f'{{"__metadata__": {metadata}, "a": {ENTRY}}}', bytes(8))
    with pytest.raises(SafetensorsError, match="__metadata__ must be an object"):
        deserialize(raw)


@pytest.mark.parametrize("header", [f'{{"a": {ENTRY}, "a": {ENTRY}}}',
                                    '{"a": {"dtype": "F32", "dtype": "I32", "shape": [2], '
                                    '"data_offsets": [0, 8]}}',
                                    f'{{"__metadata__": {{"x": "1", "x": "2"}}, "a": {ENTRY}}}'])
def test_a_key_given_twice_is_refused_not_silently_overwritten(header):
    with pytest.raises(SafetensorsError, match="more than once"):
        deserialize(raw_file(header, bytes(8)))


def test_bool_bytes_other_than_zero_and_one_are_refused():
    header = '{"b": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}'
    assert deserialize(raw_file(header, bytes([0, 1, 1])))[0]["b"].tolist() == [False, True, True]
    with pytest.raises(SafetensorsError, match="BOOL tensor 'b' holds bytes other than 0 and 1"):
        deserialize(raw_file(header, bytes([0, 2, 1])))


def test_a_big_endian_host_is_refused_for_reading_and_writing(monkeypatch):
    raw = serialize({"a": torch.ones(2)})
    monkeypatch.setattr(st, "sys", types.SimpleNamespace(byteorder="big"))
    with pytest.raises(RuntimeError, match="big-endian"):
        deserialize(raw)
    with pytest.raises(RuntimeError, match="big-endian"):
        serialize({"a": torch.ones(2)})


def test_a_valid_file_with_metadata_and_padding_is_read():
    head = json.dumps({"__metadata__": {"format": "pt"}, "a": json.loads(ENTRY)})
    head += " " * (-len(head) % 8)
    tensors, meta = deserialize(raw_file(head, struct.pack("<2f", 1.5, -2.0)))
    assert meta == {"format": "pt"} and tensors["a"].tolist() == [1.5, -2.0]


@pytest.mark.parametrize("offsets, data_bytes, message", [
    ([[0, 8], [12, 20]], 20, "leaves a gap"),
    ([[0, 8], [4, 12]], 12, "overlaps the previous tensor"),
    ([[0, 8], [8, 16]], 24, "data section has 24 bytes but the tensors cover 16"),
])
def test_tensors_must_tile_the_data_section_in_memory_and_from_a_map(offsets, data_bytes,
                                                                      message, tmp_path):
    from tiny_gpt.util.safetensors_mapped import read_header
    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": span}
              for name, span in zip("ab", offsets)}
    raw = raw_file(json.dumps(header), bytes(data_bytes))
    with pytest.raises(SafetensorsError, match=message):
        deserialize(raw)
    (tmp_path / "f.safetensors").write_bytes(raw)
    with pytest.raises(SafetensorsError, match=message):
        read_header(tmp_path / "f.safetensors")
