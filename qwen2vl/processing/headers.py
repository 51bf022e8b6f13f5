"""What an image or a video is, read from its header: sizes, frame count and rate, no pixel decoding.

One probe for everyone who needs a size before (or instead of) decoding: the processor's limit
checks (image.py, video.py), `POST /v1/token_count` and the server's context check
(server/tokens.py), and `qwen2vl tokens` (cli.py). An image's size is the size it is *seen* at:
EXIF orientation applied, as `load_image` applies it when decoding, so a photo tagged "rotate 90"
costs the tokens of its portrait, whoever asks.
"""

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .media import MediaError

try:
    import av
except ImportError:  # video is optional: a minimal install (e.g. a GPU image without PyAV) still runs images
    av = None
DECODE_ERRORS = (av.error.FFmpegError, OSError, EOFError) if av else (OSError, EOFError)

_SWAP_ORIENTATIONS = {5, 6, 7, 8}  # EXIF rotations by 90 degrees: width and height trade places
_ORIENTATION_TAG = 0x0112


class NotAnImage(MediaError):
    """The data is no image PIL can read (it may still be a video)."""


@dataclass(frozen=True)
class VideoHeader:
    width: int
    height: int
    frames: int  # in the file (counted from packets when the header has no count)
    fps: float

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


def open_image(data: bytes | Path, what: str = "image") -> Image.Image:
    """The image with only its header read (PIL decodes lazily); MediaError for data that is not an
    image PIL can read, or one PIL itself refuses as a decompression bomb."""
    try:
        return Image.open(data if isinstance(data, Path) else io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own, larger limit, checked inside Image.open
        raise MediaError(f"{what}: image refused before decoding: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # the type only: PIL's message holds the file's path, which a server must not show
        raise NotAnImage(f"{what}: not a readable image ({type(e).__name__})") from None


def seen_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as it is displayed: EXIF orientation applied."""
    width, height = image.size
    return (height, width) if _orientation(image.info.get("exif")) in _SWAP_ORIENTATIONS else (width, height)


def image_header(data: bytes | Path, what: str = "image") -> tuple[int, int]:
    """(width, height) as the image will be seen, reading the header only."""
    with open_image(data, what) as image:
        width, height = seen_size(image)
    if width < 1 or height < 1:
        raise MediaError(f"{what}: image is {width}x{height}")
    return width, height


def _orientation(exif) -> int | None:
    """EXIF orientation from the header's raw EXIF block. Not `Image.getexif()`: for PNG it decodes
    the whole image to look for EXIF after the pixels, which is what a bomb wants."""
    if not isinstance(exif, (bytes, bytearray)):
        return None
    data = Image.Exif()
    try:
        data.load(bytes(exif))
    except Exception:  # a broken EXIF block only loses the rotation hint
        return None
    return data.get(_ORIENTATION_TAG)


def open_video(data: bytes | Path):
    """A PyAV container (use it as a context manager)."""
    if av is None:
        raise MediaError("video decoding needs PyAV, which is not installed: pip install av")
    return av.open(str(data) if isinstance(data, Path) else io.BytesIO(data))


def video_header(data: bytes | Path, what: str = "video", *, max_pixels: int | None = None,
                 max_seconds: float | None = None) -> VideoHeader:
    """Size, frame count and rate from the container. When the header has no frame count (webm,
    mkv) the packets are counted, which reads but does not decode; `max_pixels` (per frame) and
    `max_seconds` (from the container's duration) refuse a file before that, when given."""
    try:
        with open_video(data) as container:
            if not container.streams.video:
                raise MediaError(f"{what}: no video stream in the file")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            width, height, frames = stream.codec_context.width, stream.codec_context.height, stream.frames
            if max_pixels is not None and width * height > max_pixels:
                raise MediaError(f"{what}: video frames are {width}x{height} = {width * height:,} pixels, over "
                                 f"the limit of {max_pixels:,} (MediaPolicy.max_image_pixels)")
            if max_seconds is not None and container.duration is not None:
                check_seconds(container.duration / av.time_base, max_seconds, what)
            if not frames:
                frames = sum(1 for p in container.demux(stream) if p.size)
    except MediaError:
        raise
    except (*DECODE_ERRORS, ValueError) as e:
        raise MediaError(f"{what}: not a readable video ({type(e).__name__})") from None
    if not rate or not frames or width < 1 or height < 1:
        raise MediaError(f"{what}: video has no frames, size or frame rate in its header")
    return VideoHeader(width, height, frames, float(rate))


def check_seconds(seconds: float, max_seconds: float, what: str = "video") -> None:
    if seconds > max_seconds:
        raise MediaError(f"{what} is {seconds:.1f} s long, over the limit of {max_seconds:g} s "
                         "(MediaPolicy.max_video_seconds)")


def media_header(data: bytes | Path, what: str = "media") -> tuple[int, int] | VideoHeader:
    """An image's (width, height) or a video's header, whichever the data is."""
    try:
        return image_header(data, what)
    except NotAnImage:
        pass
    try:
        return video_header(data, what)
    except MediaError:
        raise MediaError(f"{what}: neither an image nor a video this build can read") from None
