from protos.generate import stale_stubs


def test_generated_stubs_match_the_proto_sources():
    assert stale_stubs() == [], "run `make protos` and commit the regenerated stubs"


def test_shard_service_exposes_the_contracted_methods():
    from protos import shard_pb2

    service = shard_pb2.DESCRIPTOR.services_by_name["Shard"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "LoadAdapter", "UnloadAdapter", "ListAdapters", "Stats", "MergeAdapter", "UnmergeAdapter"}
    assert methods["Generate"].server_streaming
    assert not any(m.server_streaming for name, m in methods.items() if name != "Generate")
