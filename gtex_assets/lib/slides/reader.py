"""Open whole-slide images with slideio and describe them; explain why one will not open."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

SLIDE_DRIVER = "SVS"


class SlideReadError(RuntimeError):
    """A slide that cannot be used; the message is the quarantine reason."""


@dataclass(frozen=True)
class SlideInfo:
    width: int
    height: int
    mpp_x: float | None  # None: the description has no MPP (see lib.slides.mpp for the policy)
    mpp_y: float | None
    magnification: float
    levels: int
    level_downsamples: tuple[float, ...]
    channels: int
    file_bytes: int

    def as_row(self) -> dict:
        d = asdict(self)
        d["level_downsamples"] = list(self.level_downsamples)
        return d


def _looks_like_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(4)
    return magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_scene(path: str | Path, driver: str = SLIDE_DRIVER):
    """slideio scene 0 of a slide, raising SlideReadError with a readable reason."""
    import slideio  # heavy native module: imported where slides are read

    path = Path(path)
    if not path.exists():
        raise SlideReadError(f"{path.name}: file does not exist")
    if path.stat().st_size == 0:
        raise SlideReadError(f"{path.name}: empty file (0 bytes)")
    if not _looks_like_tiff(path):
        raise SlideReadError(f"{path.name}: not a TIFF/SVS file (bad magic bytes)")
    try:
        slide = slideio.open_slide(str(path), driver)
        return slide.get_scene(0)
    except Exception as e:  # slideio raises plain RuntimeErrors with C++ messages
        raise SlideReadError(f"{path.name}: slideio cannot open it ({_short(e)})") from None


def inspect_slide(
    path: str | Path, driver: str = SLIDE_DRIVER, check_read: bool = True
) -> SlideInfo:
    """Dimensions, resolution, magnification and pyramid of a slide.

    ``check_read`` decodes a small block at the centre of the lowest-resolution level so a
    slide whose header parses but whose tile data is broken is caught here, not while tiling.
    A TIFF whose codec slideio lacks (e.g. JPEG-2000 tiles as tifffile writes them) passes when
    tifffile decodes it: the tiler reads TIFFs through tifffile. A missing MPP is not an error
    here (``mpp_x`` None); :func:`gtex_assets.lib.slides.mpp.resolve_mpp` decides.
    """
    path = Path(path)
    scene = open_scene(path, driver)
    try:
        width, height = (int(v) for v in scene.size)
        res = scene.resolution
        mag = float(scene.magnification)
        n_levels = int(scene.num_zoom_levels)
        downs = tuple(
            round(1.0 / float(scene.get_zoom_level_info(i).scale), 4) for i in range(n_levels)
        )
        channels = int(scene.num_channels)
    except Exception as e:
        raise SlideReadError(f"{path.name}: unreadable metadata ({_short(e)})") from None
    if width <= 0 or height <= 0:
        raise SlideReadError(f"{path.name}: image has no pixels ({width}x{height})")
    has_mpp = bool(res) and res[0] > 0 and res[1] > 0
    # slideio reads the missing part of a truncated file as white without an error.
    truncated = _truncation(path)
    if truncated:
        raise SlideReadError(f"{path.name}: {truncated}")
    if check_read:
        try:
            side = min(width, height, 256)
            block = scene.read_block(
                ((width - side) // 2, (height - side) // 2, side, side),
                size=(max(1, side // 8), max(1, side // 8)),
            )
            if block is None or block.size == 0:
                raise ValueError("empty block")
        except Exception as e:
            if not _tifffile_decodes(path):
                raise SlideReadError(
                    f"{path.name}: pixel data cannot be decoded ({_short(e)})"
                ) from None
    return SlideInfo(
        width=width,
        height=height,
        mpp_x=float(res[0]) * 1e6 if has_mpp else None,
        mpp_y=float(res[1]) * 1e6 if has_mpp else None,
        magnification=mag,
        levels=n_levels,
        level_downsamples=downs,
        channels=channels,
        file_bytes=path.stat().st_size,
    )


def _truncation(path: Path) -> str | None:
    """Why the TIFF's level-0 image data does not fit in the file (cut short), or None."""
    import logging

    import tifffile

    size = path.stat().st_size
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its own "invalid offset" noise
    try:
        with tifffile.TiffFile(str(path)) as tif:
            page = tif.pages[0]
            end = max(
                (
                    int(o) + int(n)
                    for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)
                ),
                default=0,
            )
    except Exception as e:
        return f"TIFF structure unreadable ({_short(e)})"
    if end > size:
        return (
            f"file truncated: level 0 image data runs to byte {end:,} but the file has "
            f"{size:,} bytes (re-download or re-copy the slide)"
        )
    return None


def _tifffile_decodes(path: Path) -> bool:
    """Whether tifffile decodes the centre segment of the slide's smallest pyramid level."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            pages = [p for p in tif.pages if p.is_tiled and p.samplesperpixel >= 3]
            if not pages:
                return False
            page = min(pages, key=lambda p: p.imagewidth * p.imagelength)
            i = len(page.dataoffsets) // 2
            fh = tif.filehandle
            fh.seek(page.dataoffsets[i])
            data = fh.read(page.databytecounts[i])
            seg, _, _ = page.decode(data, i, jpegtables=getattr(page, "jpegtables", None))
            return seg is not None and seg.size > 0
    except Exception:
        return False


def _short(e: BaseException, limit: int = 200) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg[:limit]
