/*
 * Import a wsi-espnet label mask as classified annotations on the slide that is open in QuPath.
 *
 * For QuPath 0.4, 0.5 and 0.6. Open the slide, then Automate > Script editor > open this file > Run
 * (or "Run for project" to do every slide that has a mask next to it).
 *
 * What it does:
 *   1. finds the mask: MASK_PATH below, or "<slide name without extension>.mask.tif" (then
 *      "<slide file name>.mask.tif") in the slide's folder;
 *   2. reads the class names and colours, the slide scale and the slide's bounds offset that
 *      wsi-espnet stored in the mask's OME-XML;
 *   3. opens the mask as a second image (Bio-Formats; it is not shown) and traces each class with
 *      QuPath's own ContourTracing (exact pixel outlines, tile by tile);
 *   4. scales the outlines from mask pixels to slide pixels, subtracts the bounds offset when
 *      QuPath shows the slide cropped to its bounds (MIRAX, some Hamamatsu, read by OpenSlide
 *      without --no-crop: the image is then smaller than the slide size the mask records), and
 *      adds one annotation per class, classified with the class's name and colour (the name made
 *      ASCII without ':' as in wsi-espnet's GeoJSON, so both routes give the same classes).
 *
 * Written against QuPath's source (ContourTracing.traceGeometry, GeometryTools.geometryToROI,
 * PathClass.fromString, QP.buildServer; the same signatures in 0.4.0, 0.5.1 and 0.6.0). It has not
 * been run inside QuPath by the wsi-espnet developers: please report problems.
 */

import javax.xml.parsers.DocumentBuilderFactory
import org.locationtech.jts.geom.util.AffineTransformation
import org.xml.sax.InputSource
import qupath.lib.analysis.images.ContourTracing
import qupath.lib.common.ColorTools
import qupath.lib.objects.PathObjects
import qupath.lib.objects.classes.PathClass
import qupath.lib.regions.ImagePlane
import qupath.lib.roi.GeometryTools

// ------------------------------------------------------------------------------------ settings
String MASK_PATH = null          // full path of the mask, or null to look next to the slide
boolean SKIP_BACKGROUND = true   // do not import the class named "Background"
Boolean APPLY_OFFSET = null      // null: subtract the bounds offset only when QuPath shows the
                                 // slide cropped to its bounds; true/false: force
boolean CLEAR_EXISTING = false   // remove existing annotations of the imported classes first
// ---------------------------------------------------------------------------------------------

def imageData = getCurrentImageData()
if (imageData == null) {
    println "Open a slide first."
    return
}
def slideServer = imageData.getServer()

// 1. Find the mask
File maskFile = null
if (MASK_PATH != null) {
    maskFile = new File(MASK_PATH)
} else {
    def uris = slideServer.getURIs()
    def uri = uris.isEmpty() ? null : uris.iterator().next()
    if (uri == null || uri.getScheme() != "file") {
        println "Cannot tell where the slide file is: set MASK_PATH at the top of the script."
        return
    }
    def slideFile = new File(uri)
    def name = slideFile.getName()
    def stem = name.contains(".") ? name.substring(0, name.lastIndexOf(".")) : name
    maskFile = [new File(slideFile.getParentFile(), stem + ".mask.tif"),
                new File(slideFile.getParentFile(), name + ".mask.tif")].find { it.isFile() }
    if (maskFile == null) {
        println "No ${stem}.mask.tif next to ${slideFile}: set MASK_PATH at the top of the script."
        return
    }
}
if (!maskFile.isFile()) {
    println "Mask not found: ${maskFile}"
    return
}

// 2. Read the wsi-espnet metadata (OME-XML in the first ImageDescription)
def tiff = new loci.formats.tiff.TiffParser(maskFile.getAbsolutePath())
String xml
try {
    xml = tiff.getComment()
} finally {
    tiff.getStream().close()
}
if (xml == null || !xml.contains("wsi-espnet/classes")) {
    println "${maskFile} has no wsi-espnet class list; was it written by wsi-espnet?"
    return
}
def doc = DocumentBuilderFactory.newDefaultInstance().newDocumentBuilder().parse(new InputSource(new StringReader(xml)))
def maps = [:]
def annotationNodes = doc.getElementsByTagName("MapAnnotation")
for (int i = 0; i < annotationNodes.getLength(); i++) {
    def node = annotationNodes.item(i)
    def entries = [:]
    def pairs = node.getElementsByTagName("M")
    for (int j = 0; j < pairs.getLength(); j++)
        entries[pairs.item(j).getAttribute("K")] = pairs.item(j).getTextContent()
    maps[node.getAttribute("Namespace")] = entries
}
def classNames = maps["wsi-espnet/classes"] ?: [:]
def classColors = maps["wsi-espnet/class-colors"] ?: [:]
def slideInfo = maps["wsi-espnet/slide"] ?: [:]
def madeBy = maps["wsi-espnet/provenance"] ?: [:]

// The class name as wsi-espnet writes it in GeoJSON: QuPath 0.4 reads files in the platform's
// encoding (so ASCII), and a ':' would make a sub-class.
String qupathName(String name) {
    String ascii = java.text.Normalizer.normalize(name, java.text.Normalizer.Form.NFKD).replaceAll("[^\\x00-\\x7F]", "")
    ascii = ascii.replaceAll("[\\x00-\\x1F\\x7F]", " ").replace(":", "-").trim()
    return ascii.isEmpty() ? "Unnamed" : ascii
}

// 3. Open the mask as a second image and work out mask pixel -> slide pixel
def maskServer = buildServer(maskFile.getAbsolutePath())
try {
    double scale
    if (slideInfo.containsKey("scale")) {
        scale = Double.parseDouble(slideInfo["scale"])   // what wsi-espnet used: exact
    } else {
        def slideCal = slideServer.getPixelCalibration()
        def maskCal = maskServer.getPixelCalibration()
        if (!slideCal.hasPixelSizeMicrons() || !maskCal.hasPixelSizeMicrons()) {
            println "Neither a recorded scale nor pixel sizes for both images: cannot place the mask."
            return
        }
        scale = maskCal.getAveragedPixelSizeMicrons() / slideCal.getAveragedPixelSizeMicrons()
    }
    double boundsX = Double.parseDouble(slideInfo.getOrDefault("bounds-x", "0"))
    double boundsY = Double.parseDouble(slideInfo.getOrDefault("bounds-y", "0"))
    boolean applyOffset
    if (APPLY_OFFSET != null) {
        applyOffset = APPLY_OFFSET
    } else if ((madeBy["slide-size"] ?: "") ==~ /\d+x\d+/) {
        // QuPath's OpenSlide reader crops a slide with bounds (unless --no-crop), whatever server
        // wraps it: the image it shows is then smaller than the slide wsi-espnet read.
        def (fullWidth, fullHeight) = madeBy["slide-size"].split("x").collect { it as long }
        applyOffset = (boundsX != 0 || boundsY != 0) &&
                      (slideServer.getWidth() != fullWidth || slideServer.getHeight() != fullHeight)
    } else {  // a mask older than wsi-espnet's provenance record: OpenSlide crops by default
        applyOffset = slideServer.getServerType() == "OpenSlide"
    }
    double dx = applyOffset ? -boundsX : 0.0
    double dy = applyOffset ? -boundsY : 0.0
    // x' = scale * x + dx, y' = scale * y + dy
    def toSlide = new AffineTransformation(scale, 0, dx, 0, scale, dy)
    println "Mask ${maskFile.getName()}: ${maskServer.getWidth()} x ${maskServer.getHeight()} px, " +
            "scale ${scale}, offset (${dx}, ${dy})"

    // 4. One annotation per class
    def hierarchy = imageData.getHierarchy()
    def annotations = []
    def plane = ImagePlane.getDefaultPlane()
    // Distinct names, as wsi-espnet writes them (QuPath would merge two classes of one name)
    def writtenNames = [:]
    for (def key : classNames.keySet().sort { it as int }) {
        String n = qupathName(classNames[key])
        while (writtenNames.containsValue(n))
            n = n + " (" + key + ")"
        writtenNames[key] = n
    }
    for (def key : classNames.keySet().sort { it as int }) {
        int id = key as int
        String name = writtenNames[key]
        if (SKIP_BACKGROUND && name.equalsIgnoreCase("Background"))
            continue
        Integer rgb = null
        def hex = classColors[key]
        if (hex != null && hex.startsWith("#") && hex.length() == 7)
            rgb = ColorTools.packRGB(Integer.parseInt(hex.substring(1, 3), 16),
                                     Integer.parseInt(hex.substring(3, 5), 16),
                                     Integer.parseInt(hex.substring(5, 7), 16))
        // channel 0, pixel values id..id inclusive: exactly this class
        def geometry = ContourTracing.traceGeometry(maskServer, null, null, 0, id, id)
        if (geometry == null || geometry.isEmpty())
            continue
        geometry = toSlide.transform(geometry)
        def pathClass = PathClass.fromString(name, rgb)
        if (CLEAR_EXISTING) {
            def old = hierarchy.getAnnotationObjects().findAll { it.getPathClass() == pathClass }
            hierarchy.removeObjects(old, true)
        }
        def annotation = PathObjects.createAnnotationObject(GeometryTools.geometryToROI(geometry, plane), pathClass)
        annotation.setName(name)
        annotations << annotation
        println "  ${name}: ${String.format('%.0f', geometry.getArea())} px^2 on the slide"
    }
    addObjects(annotations)
    println "Added ${annotations.size()} annotations."
} finally {
    maskServer.close()
}
