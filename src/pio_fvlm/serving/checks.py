"""Checks of an OpenAI chat completion request before the model sees it.

A malformed request (not JSON, no ``messages``, a message without a role, an image or a video
frame that is neither an http(s) URL nor a base64 ``data:image/...`` URL that decodes to an
image, a video file instead of its frames) gets a
message saying what is wrong; the HTTP app answers it with a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import json


def check_image_url(url: object) -> str | None:
    """Why ``url`` cannot be an image of a request, or None when it can."""
    if not isinstance(url, str):
        return f"image_url.url must be a string; got {type(url).__name__}"
    if url.startswith(("http://", "https://")):
        return None  # fetched by the server
    shown = url if len(url) <= 40 else url[:40] + "..."
    if not url.startswith("data:"):
        return f"image_url.url must be an http(s) URL or a data:image/<format>;base64,<data> URL; got {shown!r}"
    header, _, data = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        return f"an image data URL must start with data:image/<format>;base64, ; got {shown!r}"
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return "the image data URL does not hold valid base64"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "the image data URL does not decode to an image (PNG, JPEG, WebP, ... as PIL reads them)"
    return None


def check_chat_request(body: bytes) -> str | None:
    """Why a chat completion request body cannot be served, or None when it can."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "the request body is not JSON: send an object with 'messages' (OpenAI chat completion format)"
    if not isinstance(payload, dict):
        return "the request body must be a JSON object with 'messages'"
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {'role': ..., 'content': ...} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"messages[{i}] must be an object with a 'role' string"
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            return f"messages[{i}].content must be a string or a list of parts"
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                return f"messages[{i}].content[{j}] must be an object with a 'type'"
            if part["type"] == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                problem = check_image_url(url)
                if problem is not None:
                    return f"messages[{i}].content[{j}]: {problem}"
            elif part["type"] == "video":
                problem = check_video_frames(part.get("video"))
                if problem is not None:
                    return f"messages[{i}].content[{j}]: {problem}"
            elif part["type"] == "video_url":
                return (f"messages[{i}].content[{j}]: video files are not decoded here; send the video as its "
                        f"frames: {{'type': 'video', 'video': [frame image URL, ...]}}")
    return None


MAX_VIDEO_FRAMES = 512


def check_video_frames(frames: object) -> str | None:
    """Why ``frames`` cannot be a video part's frames (a list of image URLs), or None when they can."""
    if not isinstance(frames, list) or not frames:
        return "a video part needs 'video': a non-empty list of its frames' image URLs"
    if len(frames) > MAX_VIDEO_FRAMES:
        return f"a video part has {len(frames)} frames; send at most {MAX_VIDEO_FRAMES} (sample them first)"
    for k, url in enumerate(frames):
        problem = check_image_url(url)
        if problem is not None:
            return f"video frame {k}: {problem}"
    return None
