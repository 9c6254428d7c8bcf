from .conftest import Server, post


async def test_post_then_query(server: Server) -> None:
    response = await post(server.client, {"key": "a", "value": 2})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 1, "duplicates": 0}
    response = await server.client.get("/v1/aggregates", params={"key": "a"})
    assert response.json()["results"][0]["buckets"][0]["count"] == 1
