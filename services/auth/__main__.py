from libs.common.service import main
from services.auth.service import AuthService

main(AuthService)
