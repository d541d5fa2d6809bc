from libs.common.service import main
from services.gateway.service import GatewayService

main(GatewayService)
