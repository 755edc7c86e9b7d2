"""The committed gRPC stubs are exactly what grpcio-tools generates from the committed proto."""

from pathlib import Path

from nlora_serve.proto.generate import PROTO, ROOT, generate


def test_committed_stubs_match_the_proto(tmp_path):
    for fresh in generate(tmp_path):
        committed = ROOT / PROTO.parent / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run `python -m nlora_serve.proto.generate`")


def test_stubs_import_and_round_trip():
    from nlora_serve.proto import nlora_pb2

    req = nlora_pb2.GenerateRequest(adapter="acme", token_ids=nlora_pb2.TokenIds(ids=[1, 2, 3]))
    req.sampling.temperature = 0.0
    back = nlora_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back.WhichOneof("prompt") == "token_ids" and list(back.token_ids.ids) == [1, 2, 3]
    assert back.sampling.HasField("temperature") and not back.sampling.HasField("top_p")
    assert Path(nlora_pb2.__file__).parent == ROOT / PROTO.parent
