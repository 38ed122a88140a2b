"""The load generators' lean HTTP/1.1 client (serve/web/client.py), against a small in-process server.

The server answers each request with its number on the connection and the connection's number, split across
two writes, refuses every third with 503, and closes each connection after two answers: the client must read
whole answers by Content-Length, keep connections alive, open new ones when the server closes them, and never
hold more than its limit open.
"""
import asyncio

from serve.web.client import Client, request_bytes


async def serve_counting(opened: list):
    async def handle(reader, writer):
        conn = len(opened)
        opened.append(conn)
        for n in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            size = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
            body = await reader.readexactly(size)
            status = b"503 Service Unavailable" if body == b"refuse" else b"200 OK"
            answer = b"%d:%d:%s" % (conn, n, body)
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n" % len(answer))
            await writer.drain()
            writer.write(b"\r\n" + answer)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_the_client_reads_whole_answers_reuses_connections_and_reopens_closed_ones():
    async def go():
        opened: list = []
        server = await serve_counting(opened)
        port = server.sockets[0].getsockname()[1]
        client = Client(f"http://127.0.0.1:{port}", connections=2)
        bodies = [b"refuse" if i % 3 == 2 else b"q%d" % i for i in range(12)]
        answers = await asyncio.gather(*[client.post(request_bytes(f"127.0.0.1:{port}", "/predict", b, {}))
                                         for b in bodies])
        client.close()
        server.close()
        await server.wait_closed()
        return opened, answers, bodies

    opened, answers, bodies = asyncio.run(go())
    assert [s for s, _ in answers] == [503 if b == b"refuse" else 200 for b in bodies]
    assert [a.rsplit(b":", 1)[1] for _, a in answers] == bodies   # each answer whole, and its own
    assert len(opened) == 6                                       # two answers a connection, then a new one
    used = {}
    for _, a in answers:
        conn, n, _ = a.split(b":")
        used.setdefault(conn, []).append(int(n))
    assert all(sorted(ns) == [0, 1] for ns in used.values())     # every connection kept alive for both
