"""The viewer window, in its own process: ``python -m endpoint.window TITLE``.

It imports OpenCV and nothing of PyAV (the two bundle conflicting libraries: with PyAV loaded
first, OpenCV's Qt window hangs). Frames come on stdin, each as a header (width, height, length
of the text), the overlay text (lines) and the BGR pixels; EOF closes the window.
"""

from __future__ import annotations

import struct
import sys

HEADER = struct.Struct("!HHI")


def main() -> int:
    import cv2
    import numpy as np

    title = sys.argv[1] if len(sys.argv) > 1 else "vphone"
    cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)
    stream = sys.stdin.buffer
    while True:
        header = stream.read(HEADER.size)
        if len(header) < HEADER.size:
            break
        width, height, text_len = HEADER.unpack(header)
        text = stream.read(text_len).decode()
        pixels = stream.read(width * height * 3)
        if len(pixels) < width * height * 3:
            break
        image = np.frombuffer(pixels, np.uint8).reshape(height, width, 3).copy()
        lines = text.splitlines()
        for i, line in enumerate(lines):
            y = height - 12 - 22 * (len(lines) - 1 - i)
            cv2.putText(image, line, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3)
            cv2.putText(image, line, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
        cv2.imshow(title, image)
        cv2.waitKey(1)
    cv2.destroyAllWindows()
    return 0


if __name__ == "__main__":
    sys.exit(main())
