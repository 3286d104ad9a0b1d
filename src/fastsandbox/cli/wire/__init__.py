"""The lean client of `fsb exec`: one gRPC call over HTTP/2 on a socket, without grpc (h2.py),
HPACK (hpack.py) and the Exec messages in protobuf wire format (pb.py)."""
