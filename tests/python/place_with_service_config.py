"""Places orders through a gRPC channel configured only by the published
service config (deploy/grpc-service-config.json): no retry loop of its own.

usage: place_with_service_config.py ADDR N SERVICE_CONFIG STUBS_DIR

Prints `placed KEY ORDER_ID REPLAYED` for each order acknowledged and
`failed KEY CODE` for each call that was not; exits 0 when all succeeded.
Each order gets one fresh key, sent unchanged on every attempt the channel
makes (the key is in the message, so a retry cannot place a second order).
"""

import json
import sys
import uuid

import grpc

addr, n, config_path, stubs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.path.insert(0, stubs)
from orders.v1 import orders_pb2, orders_pb2_grpc  # noqa: E402

with open(config_path) as f:
    service_config = json.dumps(json.load(f))
channel = grpc.insecure_channel(
    addr,
    options=[("grpc.service_config", service_config), ("grpc.enable_retries", 1)],
)
stub = orders_pb2_grpc.OrderServiceStub(channel)
failures = 0
for i in range(n):
    key = str(uuid.uuid4())
    request = orders_pb2.PlaceOrderRequest(
        client_request_id=key,
        symbol="AAPL",
        side=orders_pb2.SIDE_BUY,
        order_type=orders_pb2.ORDER_TYPE_LIMIT,
        quantity="1",
        limit_price="100",
    )
    try:
        response = stub.PlaceOrder(request)
        print(f"placed {key} {response.order.order_id} {response.replayed}", flush=True)
    except grpc.RpcError as error:
        failures += 1
        print(f"failed {key} {error.code().name}", flush=True)
sys.exit(1 if failures else 0)
