from qlora_np.cli import main
import sys
sys.exit(main())
