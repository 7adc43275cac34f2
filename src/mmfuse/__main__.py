from mmfuse.engine.cli import main

raise SystemExit(main())
