"""Server-side ceilings: what one request may ask for, and the media policy it is fetched under.

Every number here is an operator choice with a command-line flag (`add_limit_arguments`). Limits
that bound the work of a request (body bytes, items, bytes per item, pixels before decoding,
frames, seconds) refuse the request with a 4xx naming the limit; per-request vision options
(`mm_processor_kwargs`: max_pixels, fps, ...) are *clamped* to the ceilings instead, because a
client asking for more detail than the operator allows should get the allowed detail, not an error.
"""

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from qwen2vl.processing.media import MediaPolicy
from qwen2vl.processing.vision_config import VisionProcessingConfig

MiB = 2**20

# Vision options a request may set, in the body's mm_processor_kwargs or on one image/video part.
IMAGE_KEYS = ("min_pixels", "max_pixels")
VIDEO_KEYS = (*IMAGE_KEYS, "total_pixels", "fps", "nframes", "min_frames", "max_frames", "video_start", "video_end")


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 32 * MiB  # whole request body (base64 media included)
    max_images: int = 8  # images per request
    max_videos: int = 2  # videos per request
    max_image_bytes: int = 20 * MiB  # one image, downloaded or decoded from base64
    max_video_bytes: int = 200 * MiB
    max_image_pixels: int = 8192 * 4096  # width*height from the header, before decoding (bombs)
    max_pixels: int | None = None  # resize ceiling per image/frame; None: the checkpoint's max_pixels
    max_video_frames: int = 256  # frames sampled from one video
    max_video_seconds: float = 600.0
    max_fps: float = 4.0  # sampling rate a request may ask for
    max_n: int = 8  # completions per request
    max_stop: int = 16  # stop strings per request
    max_embedding_inputs: int = 128  # inputs of one /v1/embeddings request
    max_queue: int = 64  # requests admitted at once (preprocessing, waiting, running); more get 429
    max_stored_responses: int = 1000  # /v1/responses kept for previous_response_id; the oldest go first
    max_stored_bytes: int = 256 * MiB  # their conversations' JSON together (base64 media included)
    media_timeout: float = 20.0  # seconds for one download, redirects included
    allowed_media_domains: tuple[str, ...] | None = None  # None: any public host
    allow_private_media: bool = False  # loopback/private/link-local hosts (tests, trusted networks)
    allowed_local_media_path: tuple[str, ...] = ()  # folders file:// may read; empty: no local files

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"server limit {f.name} must be positive, got {value}")

    def media_policy(self) -> MediaPolicy:
        roots = tuple(str(Path(p).resolve()) for p in self.allowed_local_media_path)
        return MediaPolicy(
            max_image_bytes=self.max_image_bytes, max_video_bytes=self.max_video_bytes,
            max_image_pixels=self.max_image_pixels, max_video_seconds=self.max_video_seconds,
            max_video_frames=self.max_video_frames, timeout=self.media_timeout,
            allow_local_files=bool(roots), local_roots=roots or None, allow_remote=True,
            allowed_hosts=self.allowed_media_domains, allow_private=self.allow_private_media,
        )

    def clamp(self, kind: str, options: dict, cfg: VisionProcessingConfig) -> dict:
        """Vision options of one image/video within the ceilings. Always sets max_pixels, so the
        ceiling also applies when the client asked for nothing."""
        out = dict(options)
        lo, hi = (cfg.min_pixels, cfg.max_pixels) if kind == "image" else (cfg.video_min_pixels, cfg.video_max_pixels)
        ceiling = self.max_pixels or cfg.max_pixels
        out["max_pixels"] = max(cfg.factor**2, min(out.get("max_pixels", hi), ceiling))
        out["min_pixels"] = min(out.get("min_pixels", lo), out["max_pixels"])  # the processor needs min <= max
        if kind == "video":
            if "total_pixels" in out:
                out["total_pixels"] = min(out["total_pixels"], cfg.video_total_pixels)
            if "fps" in out:
                out["fps"] = min(out["fps"], self.max_fps)
            for key in ("nframes", "min_frames"):
                if key in out:
                    out[key] = min(out[key], self.max_video_frames)
            # always capped, so a long video is sampled more sparsely instead of refused
            out["max_frames"] = min(out.get("max_frames", cfg.max_frames), self.max_video_frames)
        return out


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerLimits()
    g = parser.add_argument_group("request limits (every bad request gets a 4xx naming the limit)")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MiB, help="request body size, MiB")
    g.add_argument("--max-images-per-request", type=int, default=d.max_images)
    g.add_argument("--max-videos-per-request", type=int, default=d.max_videos)
    g.add_argument("--max-image-mb", type=float, default=d.max_image_bytes / MiB, help="bytes of one image, MiB")
    g.add_argument("--max-video-mb", type=float, default=d.max_video_bytes / MiB, help="bytes of one video, MiB")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="width*height of an image or video frame before decoding (decompression bombs)")
    g.add_argument("--max-pixels", type=int, default=None,
                   help="resize ceiling per image/frame; clients' max_pixels is clamped to it "
                        "(default: the checkpoint's max_pixels)")
    g.add_argument("--max-video-frames", type=int, default=d.max_video_frames)
    g.add_argument("--max-video-seconds", type=float, default=d.max_video_seconds)
    g.add_argument("--max-fps", type=float, default=d.max_fps, help="ceiling for a request's video fps")
    g.add_argument("--max-n", type=int, default=d.max_n, help="completions per request")
    g.add_argument("--max-embedding-inputs", type=int, default=d.max_embedding_inputs,
                   help="inputs in one /v1/embeddings request")
    g.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests in flight at once; beyond it the server answers 429 with Retry-After")
    g.add_argument("--max-stored-responses", type=int, default=d.max_stored_responses,
                   help="responses kept in memory for previous_response_id and GET /v1/responses/{id}; "
                        "the oldest are dropped first")
    g.add_argument("--max-stored-responses-mb", type=float, default=d.max_stored_bytes / MiB,
                   help="memory for stored responses, MiB (each charged its whole conversation, base64 media included)")
    g.add_argument("--media-timeout", type=float, default=d.media_timeout, help="seconds per media download")
    m = parser.add_argument_group("media sources")
    m.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                   help="only fetch media from these hosts ('.example.com' includes subdomains)")
    m.add_argument("--allow-private-media", action="store_true",
                   help="allow media URLs on loopback/private/link-local addresses (off: SSRF protection)")
    m.add_argument("--allowed-local-media-path", nargs="+", default=[], metavar="DIR",
                   help="folders that file:// URLs may read (default: none)")


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(
        max_body_bytes=int(args.max_body_mb * MiB), max_images=args.max_images_per_request,
        max_videos=args.max_videos_per_request, max_image_bytes=int(args.max_image_mb * MiB),
        max_video_bytes=int(args.max_video_mb * MiB), max_image_pixels=args.max_image_pixels,
        max_pixels=args.max_pixels, max_video_frames=args.max_video_frames,
        max_video_seconds=args.max_video_seconds, max_fps=args.max_fps, max_n=args.max_n,
        max_embedding_inputs=args.max_embedding_inputs,
        max_queue=args.max_queue, max_stored_responses=args.max_stored_responses,
        max_stored_bytes=int(args.max_stored_responses_mb * MiB), media_timeout=args.media_timeout,
        allowed_media_domains=tuple(args.allowed_media_domains) if args.allowed_media_domains else None,
        allow_private_media=args.allow_private_media,
        allowed_local_media_path=tuple(args.allowed_local_media_path),
    )
