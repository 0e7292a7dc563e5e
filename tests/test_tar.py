"""Our streaming tar reader against Python's tarfile, on every header format tarfile writes."""

import io
import tarfile

import pytest
import webdataset as wds

from bigssl.data import tar


def archive(fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as out:
        directory = tarfile.TarInfo("images")
        directory.type = tarfile.DIRTYPE
        out.addfile(directory)
        for name, size in [("images/0001.jpg", 1000), ("images/0001.cls", 1), ("d" * 150 + "/0002.seg.png", 513),
                           ("ünïcode/0003.txt", 0)]:
            info = tarfile.TarInfo(name)
            info.size = size
            out.addfile(info, io.BytesIO(bytes(range(256)) * (size // 256) + bytes(size % 256)))
        link = tarfile.TarInfo("images/link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "0001.jpg"
        out.addfile(link)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(fmt: int):
    data = archive(fmt) if fmt != tarfile.USTAR_FORMAT else None
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold the 150-character directory: use a prefix-able one
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=fmt) as out:
            info = tarfile.TarInfo("p" * 120 + "/0001.jpg")
            info.size = 5
            out.addfile(info, io.BytesIO(b"hello"))
        data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as reference:
        expected = [(m.name, reference.extractfile(m).read()) for m in reference if m.isreg()]
    assert list(tar.members(io.BytesIO(data))) == expected


def test_samples_group_members_by_key():
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, mtime=0) as writer:
        writer.write({"__key__": "a/001", "jpg": b"J1", "cls": b"3"})
        writer.write({"__key__": "a/002", "seg.png": b"S2"})
    samples = list(tar.samples(io.BytesIO(buffer.getvalue())))
    assert samples == [{"__key__": "a/001", "jpg": b"J1", "cls": b"3"}, {"__key__": "a/002", "seg.png": b"S2"}]


def test_damage_is_an_error_not_a_quiet_end():
    data = archive(tarfile.GNU_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(data)) as reference:
        second = reference.getmember("images/0001.cls").offset  # header of the second file
    with pytest.raises(tar.TarFormatError, match="truncated tar member"):
        list(tar.members(io.BytesIO(data[: second - 100])))
    with pytest.raises(tar.TarFormatError, match="truncated tar header"):
        list(tar.members(io.BytesIO(data[: second + 100])))
    corrupt = bytearray(data)
    corrupt[second + 10] ^= 0xFF  # a byte of that header's name
    with pytest.raises(tar.TarFormatError, match="checksum"):
        list(tar.members(io.BytesIO(bytes(corrupt))))


def test_reads_through_short_reads_of_a_pipe():
    class Trickle(io.BytesIO):
        def read(self, size=-1):
            return super().read(min(size, 7) if size and size > 0 else size)

    data = archive(tarfile.PAX_FORMAT)
    assert list(tar.members(Trickle(data))) == list(tar.members(io.BytesIO(data)))
