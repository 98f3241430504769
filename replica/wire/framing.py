"""How messages cross the socket between the front end and a replica.

Each message (replica.wire.messages: one dataclass per kind) is framed as its pickled length, then
the pickle. The front end reads frames with FrameDecoder on its asyncio transport; the replica
uses BlockingChannel.
"""

from __future__ import annotations

import pickle
import select
import socket
import struct
from typing import Generic, TypeVar

from replica.wire.messages import FromReplica, Message, ToReplica

FRAME_HEADER = struct.Struct("!I")  # each message: its pickled length, then the pickle
M = TypeVar("M", bound=Message)


def encode_frame(message: Message) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(body)) + body


class FrameDecoder(Generic[M]):
    """Reassembles messages (of type M: what the other end sends) from a byte stream that
    arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[M]:
        self.buffer += data
        messages = []
        while len(self.buffer) >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(self.buffer)
            end = FRAME_HEADER.size + length
            if len(self.buffer) < end:
                break
            messages.append(pickle.loads(self.buffer[FRAME_HEADER.size : end]))
            del self.buffer[:end]
        return messages


class BlockingChannel:
    """The replica's end of its socket: blocking sends and receives of framed messages."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder[ToReplica]()
        self.ready: list[ToReplica] = []

    def send(self, message: FromReplica) -> None:
        self.sock.sendall(encode_frame(message))

    def poll(self) -> bool:
        """True if a message can be received without blocking (or the peer has gone)."""
        return bool(self.ready) or bool(select.select([self.sock], [], [], 0)[0])

    def recv(self) -> ToReplica:
        """The next message; EOFError once the front end has closed its end."""
        while not self.ready:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError
            self.ready += self.decoder.feed(data)
        return self.ready.pop(0)
